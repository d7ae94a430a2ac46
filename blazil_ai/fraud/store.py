"""The decision log: every decision (score, model version, reason, outcome) and every review change, durably.

One append-only file ``decisions.log``: an 12-byte file magic, then journal entries
(:mod:`blazil_ai.ledger.journal`: a 48-byte header with its own checksum, the payload's checksum and the
durable mark, then the payload) of these kinds:

* ``POLICY``: JSON of the :class:`~blazil_ai.fraud.types.Policy` in force (model version and thresholds);
  decisions name it by its index;
* ``DECISIONS``: an array of :data:`DECISION_DTYPE` rows (one frame per scored batch);
* ``CHANGES``: an array of :data:`CHANGE_DTYPE` rows (a review posted, voided or expired; a ledger
  refusal; a decision withdrawn because its transfer never reached the ledger).

A frame is written, fsynced and sealed (a SEAL entry recording it as durable, fsynced too) before
anything it holds is acknowledged. At open the frames are replayed into memory. A torn tail (bytes of a
write whose seal never made it to disk: nobody was told about them) is cut off and logged; damage to a
sealed frame stops the open with a DataError naming the file and offset, since cutting there would
silently delete every later acknowledged decision. ``blazil ledger repair`` drops a damaged frame on
request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import DataError
from blazil_ai.fraud.types import Decision, Outcome, Policy, Reason, ReviewState, finite_or_none, reason_text
from blazil_ai.ledger import journal
from blazil_ai.ledger.journal import KIND_SEAL
from blazil_ai.ledger.types import U64_MASK, u128

log = logging.getLogger(__name__)

POLICY, DECISIONS, CHANGES = 1, 2, 3
MAGIC = b"BLZFRAUD\x02\x00\x00\x00"
OLD_MAGIC = b"BLZFRAUD\x01\x00\x00\x00"
FRAME_MAGIC = 0x32444C42  # "BLD2"

DECISION_DTYPE = np.dtype([
    ("id", "<u8", (2,)), ("debit_account_id", "<u8"), ("credit_account_id", "<u8"), ("amount", "<u8"),
    ("time", "<f8"), ("decided_at", "<u8"), ("score", "<f4"), ("ledger_status", "<u4"), ("policy", "<u2"),
    ("outcome", "u1"), ("reason", "u1"), ("state", "u1"), ("pad", "V3"),
])
CHANGE_DTYPE = np.dtype([
    ("id", "<u8", (2,)), ("at", "<u8"), ("ledger_status", "<u4"), ("outcome", "u1"), ("reason", "u1"),
    ("state", "u1"), ("withdrawn", "u1"),
])


def scan_log(path: Path) -> tuple[list[journal.Frame], journal.Damage | None, int]:
    """The intact frames of a decision log (seals left out), its first damage and where its frames end, without
    changing it."""
    data = path.read_bytes()
    if data.startswith(OLD_MAGIC):
        raise DataError("decision log is in the format of an earlier version; this version reads format 2 only",
                        path=str(path))
    if not data.startswith(MAGIC):
        raise DataError("not a decision log (bad magic)", path=str(path))
    frames, damage, end = journal.scan(data, FRAME_MAGIC, len(MAGIC))
    for f in frames:
        if f.kind not in (POLICY, DECISIONS, CHANGES, KIND_SEAL):
            raise DataError(f"decision log frame at byte offset {f.offset} has unknown kind {f.kind}", path=str(path))
    return [f for f in frames if f.kind != KIND_SEAL], damage, end


_MIX = np.uint64(0x9E3779B97F4A7C15)
EMPTY, TOMBSTONE = -1, -2


class IdIndex:
    """Open-addressing hash table u64 key -> row, inserted and probed a whole batch at a time (no Python loop
    per id, which is what keeps decision bookkeeping cheap at hundreds of thousands of transfers a second)."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.vals = np.full(capacity, EMPTY, dtype=np.int64)
        self.used = 0  # live entries and tombstones

    def _home(self, keys: np.ndarray) -> np.ndarray:
        cap = len(self.keys)
        return ((keys * _MIX) >> np.uint64(64 - cap.bit_length() + 1)).astype(np.int64) & (cap - 1)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where absent."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.full(len(keys), EMPTY, dtype=np.int64)
        pos = self._home(keys)
        todo = np.arange(len(keys))
        mask = len(self.keys) - 1
        while len(todo):
            p = pos[todo]
            v = self.vals[p]
            hit = (v >= 0) & (self.keys[p] == keys[todo])
            out[todo[hit]] = v[hit]
            go_on = ~hit & (v != EMPTY)
            todo = todo[go_on]
            pos[todo] = (pos[todo] + 1) & mask
        return out

    def insert(self, keys: np.ndarray, vals: np.ndarray, fresh: bool = False) -> np.ndarray:
        """Insert keys (absent ones); returns a mask of the keys that were already present (not inserted).

        ``fresh``: the caller knows the keys are absent and distinct (skips the checks)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if 2 * (self.used + len(keys)) > len(self.keys):
            self._rehash(2 * (self.used + len(keys)))
        present = np.zeros(len(keys), dtype=bool) if fresh else self.lookup(keys) >= 0
        todo = np.flatnonzero(~present)
        # within the batch, only the first of equal keys is inserted
        if len(todo) and not fresh:
            _, first = np.unique(keys[todo], return_index=True)
            if len(first) != len(todo):
                dup = np.ones(len(todo), dtype=bool)
                dup[first] = False
                present[todo[dup]] = True
                todo = todo[~dup]
        pos = self._home(keys)
        mask = len(self.keys) - 1
        while len(todo):
            p = pos[todo]
            free = self.vals[p] < 0
            cand, slots = todo[free], p[free]
            # One key per free slot this round: every candidate writes its claim mark (-3 - its index) into
            # its slot, one write per slot survives, and the survivors take the slots (no sort for the
            # winners). Only free slots are marked and each marked slot is then given to its winner.
            claim = -3 - cand
            self.vals[slots] = claim
            won_mask = self.vals[slots] == claim
            won = cand[won_mask]
            won_slots = slots[won_mask]
            self.keys[won_slots] = keys[won]
            self.vals[won_slots] = vals[won]
            self.used += len(won)
            left = np.ones(len(todo), dtype=bool)
            left[np.flatnonzero(free)[won_mask]] = False
            todo = todo[left]
            pos[todo] = (pos[todo] + 1) & mask
        return present

    def remove(self, key: int) -> None:
        """Drop one key (a tombstone keeps later probes going)."""
        k = np.array([key], dtype=np.uint64)
        pos = int(self._home(k)[0])
        mask = len(self.keys) - 1
        while self.vals[pos] != EMPTY:
            if self.vals[pos] >= 0 and int(self.keys[pos]) == key:
                self.vals[pos] = TOMBSTONE
                return
            pos = (pos + 1) & mask

    def _rehash(self, need: int) -> None:
        live = self.vals >= 0
        keys, vals = self.keys[live], self.vals[live]
        cap = 1 << max(16, (need - 1).bit_length())
        self.keys = np.zeros(cap, dtype=np.uint64)
        self.vals = np.full(cap, EMPTY, dtype=np.int64)
        self.used = 0
        self.insert(keys, vals, fresh=True)


class DecisionStore:
    """Decisions in memory (numpy rows + an id index) backed by the fsynced decision log."""

    def __init__(self, directory: str | os.PathLike[str], fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "decisions.log"
        self.fsync = fsync
        self.rows = np.zeros(1024, dtype=DECISION_DTYPE)
        self.n = 0
        self.index = IdIndex(1 << 18)  # low 64 bits of the id -> row
        self.collisions: dict[int, int] = {}  # full id -> row, when the low word was taken
        self.policies: list[Policy] = []
        self.frames_written = 0
        self.last_low_hits = 0
        self.last_frame_rows: list[range] = []  # rows of the most recent DECISIONS frames (verified at start)
        self._lock = threading.Lock()
        self._dirty = False
        self._open()

    # ---------------------------------------------------------------- file

    def _open(self) -> None:
        if not self.path.exists():
            journal.JournalFile.create(self.path, MAGIC)
        frames, damage, end = scan_log(self.path)
        if damage is not None and not damage.torn:
            raise DataError(f"decision log is damaged at byte offset {damage.offset} ({damage.problem}); "
                            f"{len(damage.later_entries)} intact frames after it were acknowledged. It will not "
                            "open: restore it from a backup, or run 'blazil ledger repair' on the service's data "
                            "folder to drop the damaged frame", path=str(self.path))
        for fr in frames:
            if fr.kind == POLICY:
                self.policies.append(Policy(**json.loads(fr.payload)))
            elif fr.kind == DECISIONS:
                rows = np.frombuffer(fr.payload, dtype=DECISION_DTYPE)
                r = self._append_rows(rows)
                self.last_frame_rows = [*self.last_frame_rows[-7:], r]
            else:
                self._apply_changes(np.frombuffer(fr.payload, dtype=CHANGE_DTYPE))
            self.frames_written = fr.seq
        self.truncated_bytes = 0
        if damage is not None:
            self.truncated_bytes = damage.dropped_bytes
            log.warning("%s; dropped (never acknowledged)", damage.describe(self.path))
            journal.clear_tail(self.path, damage.offset)
        self._journal = journal.JournalFile(self.path, FRAME_MAGIC, end, self.fsync)
    def _write(self, kind: int, payload: bytes | memoryview) -> None:
        self.frames_written += 1
        j = self._journal
        j.append([journal.encode(FRAME_MAGIC, kind, self.frames_written, 0, len(payload), payload, j.synced),
                  payload])
        self._dirty = True

    def sync(self) -> None:
        """Make everything written so far durable and sealed (two fsyncs: the frames, then their seal)."""
        with self._lock:
            if not self._dirty:
                return
            self._journal.sync()
            self._journal.seal()
            self._journal.sync()
            self._dirty = False

    def close(self) -> None:
        """Sync and close the log."""
        self.sync()
        self._journal.close()

    # ---------------------------------------------------------------- writes

    def add_policy(self, policy: Policy) -> int:
        """Record the policy in force (reusing an identical earlier one); returns its index."""
        for i, p in enumerate(self.policies):
            if p == policy:
                return i
        with self._lock:
            self._write(POLICY, json.dumps(asdict(policy)).encode())
            self.policies.append(policy)
        self.sync()
        return len(self.policies) - 1

    def add_decisions(self, rows: np.ndarray, fresh: bool = False) -> range:
        """Write one batch of decisions (not yet synced); returns their row range (``fresh``: ids known new)."""
        rows = np.ascontiguousarray(rows)
        with self._lock:
            self._write(DECISIONS, memoryview(rows.view(np.uint8)))  # type: ignore[arg-type]
            return self._append_rows(rows, fresh)

    def add_changes(self, changes: np.ndarray) -> None:
        """Write and apply review changes / ledger refusals / withdrawals (not yet synced)."""
        if len(changes) == 0:
            return
        with self._lock:
            self._write(CHANGES, changes.tobytes())
            self._apply_changes(changes)

    # ---------------------------------------------------------------- memory

    def _append_rows(self, rows: np.ndarray, fresh: bool = False) -> range:
        n = len(rows)
        if self.n + n > len(self.rows):
            grown = np.zeros(max(self.n + n, 2 * len(self.rows)), dtype=DECISION_DTYPE)
            # A byte copy: assigning structured rows is field by field, several times slower.
            grown.view(np.uint8)[: self.n * DECISION_DTYPE.itemsize] = self.rows[: self.n].view(np.uint8)
            self.rows = grown
        start = self.n
        width = DECISION_DTYPE.itemsize
        # A byte copy: assigning structured rows field by field is several times slower.
        self.rows.view(np.uint8)[start * width:(start + n) * width] = np.ascontiguousarray(rows).view(np.uint8)
        self.n += n
        taken = self.index.insert(rows["id"][:, 0], np.arange(start, start + n, dtype=np.int64), fresh=fresh)
        for k in np.flatnonzero(taken).tolist():  # a low word seen before: found by its full id instead
            self.collisions[u128(rows["id"][k])] = start + k
        return range(start, start + n)

    def row_of(self, tid: int) -> int | None:
        """The row of transfer ``tid``'s decision, or None."""
        r = self.collisions.get(tid)
        if r is not None:
            return r
        r = int(self.index.lookup(np.array([tid & U64_MASK], dtype=np.uint64))[0])
        if r < 0:
            return None
        if u128(self.rows["id"][r]) != tid:
            return None
        return r

    def known_mask(self, ids: np.ndarray) -> np.ndarray:
        """Which ids of an ``(n, 2)`` word array already have a decision."""
        rows = self.index.lookup(ids[:, 0])
        known = rows >= 0
        self.last_low_hits = int(known.sum())  # 0: every low word is new (add_decisions may skip its checks)
        if known.any():
            known[known] = self.rows["id"][rows[known], 1] == ids[known, 1]
        if self.collisions:
            for i in np.flatnonzero(~known).tolist():
                known[i] = u128(ids[i]) in self.collisions
        return known

    def _apply_changes(self, changes: np.ndarray) -> None:
        for c in changes:
            tid = u128(c["id"])
            r = self.row_of(tid)
            if r is None:
                continue
            if c["withdrawn"]:
                # Never reached the ledger and never acknowledged: forget it, so a retry is scored afresh.
                if self.collisions.pop(tid, None) is None:
                    self.index.remove(tid & U64_MASK)
                self.rows["outcome"][r] = 0
                continue
            self.rows["state"][r] = c["state"]
            if c["outcome"]:
                self.rows["outcome"][r] = c["outcome"]
                self.rows["reason"][r] = c["reason"]
                self.rows["ledger_status"][r] = c["ledger_status"]

    # ---------------------------------------------------------------- reads

    def decision(self, r: int) -> Decision:
        """The Decision record of row ``r``."""
        from blazil_ai.ledger.types import CreateTransferStatus

        row = self.rows[r]
        policy = self.policies[int(row["policy"])] if int(row["policy"]) < len(self.policies) else Policy("unknown")
        status = int(row["ledger_status"])
        status_name = "" if status == 0 else _status_name(status, CreateTransferStatus)
        score = float(row["score"])
        return Decision(
            transfer_id=u128(row["id"]),
            debit_account_id=int(row["debit_account_id"]), credit_account_id=int(row["credit_account_id"]),
            amount=int(row["amount"]), time=float(row["time"]), score=finite_or_none(score),
            outcome=Outcome(int(row["outcome"])).name.lower(),
            reason=reason_text(int(row["reason"]), score, policy, status_name),
            model_version=policy.model_version, review_state=ReviewState(int(row["state"])).name.lower(),
            ledger_status=(status_name or "created") if int(row["outcome"]) in (1, 2) else status_name,
            decided_at_ns=int(row["decided_at"]))

    def get(self, tid: int) -> Decision | None:
        """The decision for transfer ``tid``, or None."""
        r = self.row_of(tid)
        return None if r is None else self.decision(r)

    def query(self, outcome: str | None = None, review_state: str | None = None, account: int | None = None,
              limit: int = 100) -> list[Decision]:
        """The most recent decisions matching the filters, newest first."""
        rows = self.rows[: self.n]
        mask = rows["outcome"] != 0
        if outcome is not None:
            mask &= rows["outcome"] == Outcome[outcome.upper()].value
        if review_state is not None:
            mask &= rows["state"] == ReviewState[review_state.upper()].value
        if account is not None:
            mask &= (rows["debit_account_id"] == account) | (rows["credit_account_id"] == account)
        hits = np.flatnonzero(mask)[::-1][:limit]
        return [self.decision(int(r)) for r in hits]

    def counts(self) -> dict[str, int]:
        """Decisions by outcome, and reviews by state."""
        rows = self.rows[: self.n]
        out = {o.name.lower(): int((rows["outcome"] == o.value).sum()) for o in Outcome}
        for s in (ReviewState.PENDING, ReviewState.POSTED, ReviewState.VOIDED, ReviewState.EXPIRED):
            out[f"review_{s.name.lower()}"] = int(((rows["state"] == s.value) & (rows["outcome"] != 0)).sum())
        return out


def _status_name(status: int, enum_type: Any) -> str:
    try:
        return str(enum_type(status).name.lower())
    except ValueError:
        return f"status_{status}"


def change_rows(ids: np.ndarray, *, at: int, state: int = 0, outcome: int = 0, reason: int = 0,
                ledger_status: np.ndarray | int = 0, withdrawn: bool = False) -> np.ndarray:
    """CHANGE_DTYPE rows for the ids of an ``(n, 2)`` word array."""
    out = np.zeros(len(ids), dtype=CHANGE_DTYPE)
    out["id"] = ids
    out["at"] = at
    out["state"] = state
    out["outcome"] = outcome
    out["reason"] = reason
    out["ledger_status"] = ledger_status
    out["withdrawn"] = withdrawn
    return out


__all__ = ["CHANGE_DTYPE", "DECISION_DTYPE", "DecisionStore", "Reason", "change_rows"]
