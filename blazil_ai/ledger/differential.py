"""Differential runs: the same random batches to several ledgers, their answers compared event by event.

One seed makes a small world (3-10 accounts on two ledgers of its own, ids of its own, so many seeds share one
TigerBeetle cluster) and 12-24 batches of accounts and transfers over every flag, duplicate ids, retries with a
field changed, posts and voids (right, wrong, repeated), balancing, closing, linked chains, limits, amounts near
2^128, invalid fields, and (on seeds without a sharded ledger) imported events. After every batch the statuses
and the shape of the result timestamps are compared; after the seed, lookups of every id, every account's
transfers and balances, and queries by ledger.

Imported events need timestamps in each backend's past: a batch carries symbolic ones ("just after the newest
object", "equal to it", "far future", "out of range"), made concrete per backend from what that backend
answered so far. The sharded ledger refuses imported events and cross-shard chains/balancing/closing by design,
so seeds it takes part in stay within what it offers. Pending transfers time out after an hour or never: expiry
during a run would depend on wall time. An imported post or void of a pending transfer that has a timeout is never
sent: the TigerBeetle 0.17.9 replica stops on it (an assertion, found by this run).

    python -m blazil_ai.ledger.differential --seeds 2000 --tigerbeetle ../shared/tigerbeetle/tigerbeetle --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blazil_ai.ledger import types as T
from blazil_ai.ledger.types import AMOUNT_MAX, U128_MAX, AccountFlags, Operation, TransferFlags

AF, TF = AccountFlags, TransferFlags
CT, CA = T.CreateTransferStatus, T.CreateAccountStatus
SHARDS = 4
CREATED = 0xFFFFFFFF
FAR_FUTURE = 1 << 62
OUT_OF_RANGE = 1 << 63
MARKER_LEDGER = 0x7FFF_FFFF  # above every seed's ledgers


@dataclass
class Batch:
    kind: str  # "accounts" | "transfers"
    events: list[dict[str, int]]
    stamp: list[tuple[str, int]]  # per event: ("zero"|"abs"|"after"|"at_newest"|"after_transfers", value)


@dataclass
class Report:
    seeds: int = 0
    batches: int = 0
    events: int = 0
    differences: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "batches": self.batches, "events": self.events,
                "differences": len(self.differences), "first_differences": self.differences[:10],
                "distinct_statuses": len(self.statuses)}


def _shard(i: int) -> int:
    from blazil_ai.ledger.shards import shard_of
    return shard_of(i, SHARDS)


class World:
    """One seed's random batches (the same for every backend)."""

    def __init__(self, seed: int, nonce: int, *, imported: bool, sharded: bool) -> None:
        self.r = random.Random(seed)
        self.imported = imported
        self.sharded = sharded
        self.prefix = (nonce << 64) | ((seed & 0xFFFF_FFFF) << 32)
        self.ledgers = (1 + (nonce * 8192 + 2 * seed) % 0x7FFF_FFF0, 2 + (nonce * 8192 + 2 * seed) % 0x7FFF_FFF0)
        self.accounts = [self.prefix | (1 + i) for i in range(self.r.randint(3, 10))]
        self.transfer_ids: list[int] = []
        self.pending: list[tuple[int, dict[str, int]]] = []
        self.sent: list[dict[str, int]] = []
        self.sent_ids: set[int] = set()  # ids of events sent in earlier batches
        self.next_tid = self.prefix | (1 << 20)

    def tid(self) -> int:
        self.next_tid += 1
        self.transfer_ids.append(self.next_tid)
        return self.next_tid

    def pick(self, items: list[Any]) -> Any:
        return items[self.r.randrange(len(items))]

    def odd_id(self) -> int:
        return self.r.choice([0, U128_MAX, self.prefix | 999])

    def amount(self) -> int:
        r = self.r.random()
        if r < 0.6:
            return self.r.randint(0, 100)
        if r < 0.7:
            return 0
        if r < 0.8:
            return AMOUNT_MAX
        if r < 0.9:
            return AMOUNT_MAX - self.r.randint(0, 100)
        return (1 << 127) + self.r.randint(0, 100)

    # ---------------------------------------------------------------- batches

    def account_batch(self, first: bool) -> Batch:
        r = self.r
        events, stamps = [], []
        ids = list(self.accounts) if first else [self.pick(self.accounts) for _ in range(r.randint(1, 4))]
        ids = [self.odd_id() if r.random() < 0.02 else i for i in ids]
        imported = self.imported and not first and r.random() < 0.3
        for k, aid in enumerate(ids):
            flags = r.choice([0, 0, 0, int(AF.HISTORY), int(AF.DEBITS_MUST_NOT_EXCEED_CREDITS),
                              int(AF.CREDITS_MUST_NOT_EXCEED_DEBITS),
                              int(AF.HISTORY | AF.DEBITS_MUST_NOT_EXCEED_CREDITS)])
            if r.random() < 0.04:
                flags |= int(AF.DEBITS_MUST_NOT_EXCEED_CREDITS | AF.CREDITS_MUST_NOT_EXCEED_DEBITS)
            if r.random() < 0.03:
                flags |= int(AF.CLOSED)
            if r.random() < 0.03:
                flags |= 1 << r.randint(6, 15)
            if r.random() < 0.15 and (not self.sharded or
                                      (k + 1 < len(ids) and _shard(ids[k + 1]) == _shard(aid))):
                flags |= int(AF.LINKED)
            e = dict(id=aid, debits_pending=0, debits_posted=0, credits_pending=0, credits_posted=0,
                     user_data_128=r.choice([0, 0, 7, 1 << 100]), user_data_64=r.choice([0, 0, 8]),
                     user_data_32=r.choice([0, 0, 9]), reserved=0, ledger=self.ledgers[0] if r.random() < 0.8 else
                     r.choice([self.ledgers[1], 0]), code=1 if r.random() < 0.95 else 0, flags=flags, timestamp=0)
            if r.random() < 0.03:
                e[r.choice(["debits_pending", "debits_posted", "credits_pending", "credits_posted"])] = 5
            if r.random() < 0.02:
                e["reserved"] = 1
            spec = ("zero", 0)
            if imported and r.random() < 0.9:
                e["flags"] |= int(AF.IMPORTED)
                spec = self.import_spec(k)
            elif r.random() < 0.02:
                spec = ("abs", 12345)
            if k == 0 and imported:
                e["flags"] |= int(AF.IMPORTED)
                spec = spec if spec[0] != "zero" else self.import_spec(k)
            events.append(e)
            stamps.append(spec)
        return Batch("accounts", events, stamps)

    def import_spec(self, k: int) -> tuple[str, int]:
        x = self.r.random()
        if x < 0.7:
            return ("after", 1 + 2 * k)
        if x < 0.78:
            return ("at_newest", 0)
        if x < 0.86:
            return ("after_transfers", 1 + k)
        if x < 0.93:
            return ("abs", FAR_FUTURE)
        return ("abs", self.r.choice([0, OUT_OF_RANGE]))

    def transfer_batch(self) -> Batch:
        r = self.r
        n = r.randint(1, 12)
        imported = self.imported and r.random() < 0.2
        events: list[dict[str, int]] = []
        stamps: list[tuple[str, int]] = []
        for k in range(n):
            x = r.random()
            if x < 0.15 and self.sent:
                e = dict(self.pick(self.sent))  # a retry, sometimes with one field changed
                if r.random() < 0.5:
                    f = r.choice(["amount", "user_data_64", "user_data_32", "user_data_128", "ledger", "code",
                                  "debit_account_id", "credit_account_id", "timeout", "flags", "pending_id"])
                    e[f] = {"amount": self.amount(), "flags": e["flags"] ^ int(TF.PENDING), "ledger": 0,
                            "timeout": r.choice([0, 3600]), "code": r.choice([0, 2]),
                            "pending_id": r.choice([0, self.prefix | 5])}.get(f, r.choice([0, 5, 7]))
                    if f in ("debit_account_id", "credit_account_id"):
                        e[f] = self.pick(self.accounts) if r.random() < 0.7 else 0
            elif x < 0.4 and self.pending:
                e = self.resolve()
            else:
                e = self.plain()
            if self.sharded and not self.local_ok(e):
                e["flags"] &= ~int(TF.LINKED | TF.BALANCING_DEBIT | TF.BALANCING_CREDIT | TF.CLOSING_DEBIT
                                   | TF.CLOSING_CREDIT)
            events.append(e)
            spec = ("zero", 0)
            if imported and (k == 0 or r.random() < 0.9) and not self.timed_resolve(e):
                e["flags"] |= int(TF.IMPORTED)
                e["timeout"] = e["timeout"] if r.random() < 0.1 else 0
                spec = self.import_spec(k)
            elif e["flags"] & TF.IMPORTED:
                spec = self.import_spec(k)
            elif r.random() < 0.01:
                spec = ("abs", 99)
            stamps.append(spec)
        if self.sharded:  # a chain must stay on one shard: cut it where the next event would leave
            for k in range(n):
                if events[k]["flags"] & TF.LINKED and (k + 1 == n or not self.same_home(events[k], events[k + 1])):
                    events[k]["flags"] &= ~int(TF.LINKED)
        for e in events:
            self.sent.append(e)
            self.sent_ids.add(e["id"])
            if e["flags"] & TF.PENDING and not e["flags"] & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER):
                self.pending.append((e["id"], e))
        return Batch("transfers", events, stamps)

    def timed_resolve(self, e: dict[str, int]) -> bool:
        """A post/void of a pending transfer with a timeout: TigerBeetle 0.17.9 stops (an assertion in
        post_or_void_pending_transfer) when such an event is imported, so none is sent imported."""
        if not e["flags"] & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER):
            return False
        return any(pid == e["pending_id"] and p["timeout"] for pid, p in self.pending)

    def local_ok(self, e: dict[str, int]) -> bool:
        """Whether a sharded ledger takes this event's linked/balancing/closing flags (one shard, not a resolve)."""
        if e["flags"] & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER):
            return not e["flags"] & TF.LINKED
        dr, cr = e["debit_account_id"], e["credit_account_id"]
        return dr in self.accounts and cr in self.accounts and _shard(dr) == _shard(cr)

    def same_home(self, a: dict[str, int], b: dict[str, int]) -> bool:
        # A retried id is answered where it already lives, which may be another shard: it ends a chain.
        if any(e["id"] in self.sent_ids for e in (a, b)):
            return False
        return self.local_ok(a) and self.local_ok(b) and \
            _shard(a["debit_account_id"]) == _shard(b["debit_account_id"]) and \
            not (a["flags"] | b["flags"]) & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER)

    def plain(self) -> dict[str, int]:
        r = self.r
        dr = self.pick(self.accounts) if r.random() < 0.95 else self.odd_id()
        cr = self.pick(self.accounts) if r.random() < 0.95 else self.odd_id()
        flags = 0
        for f, p in ((TF.PENDING, 0.3), (TF.LINKED, 0.12), (TF.BALANCING_DEBIT, 0.06), (TF.BALANCING_CREDIT, 0.06),
                     (TF.CLOSING_DEBIT, 0.03), (TF.CLOSING_CREDIT, 0.03)):
            if r.random() < p:
                flags |= int(f)
        if r.random() < 0.01:
            flags |= 1 << r.randint(9, 15)
        timeout = r.choice([0, 0, 0, 3600]) if flags & TF.PENDING else (3600 if r.random() < 0.02 else 0)
        tid = self.tid() if r.random() < 0.97 else self.odd_id()
        return dict(id=tid, debit_account_id=dr, credit_account_id=cr, amount=self.amount(),
                    pending_id=0 if r.random() < 0.98 else self.prefix | 77,
                    user_data_128=r.choice([0, 0, 11]), user_data_64=r.choice([0, 0, 12]),
                    user_data_32=r.choice([0, 0, 13]), timeout=timeout,
                    ledger=self.ledgers[0] if r.random() < 0.93 else r.choice([self.ledgers[1], 0]),
                    code=r.choice([1, 1, 1, 1, 2, 0]) if r.random() < 0.2 else 1, flags=flags, timestamp=0)

    def resolve(self) -> dict[str, int]:
        r = self.r
        pid, p = self.pick(self.pending)
        if r.random() < 0.05:
            pid = r.choice([0, U128_MAX, self.prefix | 4242])
        flag = int(TF.POST_PENDING_TRANSFER if r.random() < 0.55 else TF.VOID_PENDING_TRANSFER)
        if r.random() < 0.03:
            flag |= int(r.choice([TF.VOID_PENDING_TRANSFER, TF.PENDING, TF.BALANCING_DEBIT, TF.CLOSING_CREDIT]))
        amount = r.choice([0, AMOUNT_MAX, p["amount"], max(0, p["amount"] - 1), min(AMOUNT_MAX, p["amount"] + 1),
                            self.amount()])
        tid = self.tid() if r.random() < 0.97 else pid
        return dict(id=tid, pending_id=pid, amount=amount,
                    debit_account_id=0 if r.random() < 0.8 else r.choice([p["debit_account_id"],
                                                                           self.pick(self.accounts)]),
                    credit_account_id=0 if r.random() < 0.8 else r.choice([p["credit_account_id"],
                                                                            self.pick(self.accounts)]),
                    user_data_128=r.choice([0, 0, 21]), user_data_64=r.choice([0, 0, 22, p["user_data_64"]]),
                    user_data_32=r.choice([0, 0, 23]), timeout=0 if r.random() < 0.97 else 5,
                    ledger=0 if r.random() < 0.8 else r.choice([p["ledger"], self.ledgers[1]]),
                    code=0 if r.random() < 0.8 else r.choice([p["code"], 3]), flags=flag, timestamp=0)

    def batches(self, count: int) -> list[Batch]:
        out = [self.account_batch(first=True)]
        for _ in range(count - 1):
            out.append(self.account_batch(first=False) if self.r.random() < 0.1 else self.transfer_batch())
        return out


class Side:
    """One backend in a run, with the newest timestamps it has answered (to place imported events)."""

    def __init__(self, name: str, client: Any, exact_stamps: bool) -> None:
        self.name = name
        self.c = client
        self.exact = exact_stamps
        self.newest = 0
        self.newest_transfer = 0

    def mark(self, w: World) -> None:
        """Create two accounts and a transfer (in a ledger of their own) before a seed's batches: on every side the
        seed's symbolic timestamps then resolve against objects newer than anything another seed left."""
        accs = np.zeros(2, dtype=T.ACCOUNT_DTYPE)
        accs["id"] = T.u128_to_words([w.prefix | 0xFFFF_FFF0, w.prefix | 0xFFFF_FFF1])
        accs["ledger"], accs["code"] = MARKER_LEDGER, 1
        tr = np.zeros(1, dtype=T.TRANSFER_DTYPE)
        tr["id"] = T.u128_to_words([w.prefix | 0xFFFF_FFF2])
        tr["debit_account_id"], tr["credit_account_id"] = accs["id"][:1], accs["id"][1:]
        tr["ledger"], tr["code"] = MARKER_LEDGER, 1
        for op, arr in ((Operation.CREATE_ACCOUNTS, accs), (Operation.CREATE_TRANSFERS, tr)):
            status, _ = self.c._call(op, arr)
            if (status != CREATED).any():
                raise RuntimeError(f"{self.name}: marker {op.key} failed: {status.tolist()}")

    def sync(self) -> None:
        """Read the newest account and transfer timestamps (a cluster may hold other seeds' and tests' objects)."""
        q = T.QueryFilter(0, 0, 0, 0, 0, 0, 0, 1, T.QueryFilterFlags.REVERSED)
        acc = self.c._call(Operation.QUERY_ACCOUNTS, q)
        tr = self.c._call(Operation.QUERY_TRANSFERS, q)
        self.newest_transfer = int(tr["timestamp"][0]) if len(tr) else 0
        self.newest = max(self.newest_transfer, int(acc["timestamp"][0]) if len(acc) else 0)

    def stamp(self, spec: tuple[str, int]) -> int:
        kind, v = spec
        if kind == "zero":
            return 0
        if kind == "abs":
            return v
        if kind == "after":
            return self.newest + v
        if kind == "at_newest":
            return self.newest
        return self.newest_transfer + v

    def run(self, b: Batch) -> tuple[list[int], list[str], list[int]]:
        op = Operation.CREATE_ACCOUNTS if b.kind == "accounts" else Operation.CREATE_TRANSFERS
        dtype = T.OPERATIONS[op].event
        arr = np.zeros(len(b.events), dtype=dtype)
        for name in dtype.names or ():
            vals = [e[name] for e in b.events]
            arr[name] = T.u128_to_words(vals) if arr[name].ndim == 2 else vals
        given = [self.stamp(s) for s in b.stamp]
        arr["timestamp"] = given
        status, stamps = self.c._call(op, arr)
        status, stamps = status.tolist(), stamps.tolist()
        for st, ts in zip(status, stamps):
            if st == CREATED:
                self.newest = max(self.newest, ts)
                if b.kind == "transfers":
                    self.newest_transfer = max(self.newest_transfer, ts)
        return status, _stamp_shape(status, stamps, given, b, self.exact), given


def _stamp_shape(status: list[int], stamps: list[int], given: list[int], b: Batch, exact: bool) -> list[str]:
    exists = int(CT.EXISTS if b.kind == "transfers" else CA.EXISTS)
    out, base = [], None
    for i, (st, ts) in enumerate(zip(status, stamps)):
        if ts == 0:
            out.append("zero")
        elif given[i] and ts == given[i] and b.stamp[i][0] != "zero":
            out.append("given")
        elif st == exists:
            out.append("existing")
        elif not exact:
            out.append("event")
        else:
            base = ts - i if base is None else base
            out.append("event" if ts - i == base else f"event{ts - i - base:+d}")
    return out


def _coarse(shape: list[str]) -> list[str]:
    return [s if s in ("zero", "existing") else "event" for s in shape]


def _records(arr: np.ndarray) -> list[tuple[Any, ...]]:
    names = [n for n in arr.dtype.names or () if n != "timestamp"]
    cols = [T.u128_from_words(arr[n]) if arr[n].ndim == 2 else arr[n].tolist() for n in names]
    return list(zip(*cols))


def _state(side: Side, w: World) -> dict[str, Any]:
    c = side.c
    both = T.AccountFilterFlags.DEBITS | T.AccountFilterFlags.CREDITS
    out: dict[str, Any] = {
        "accounts": _records(c._call(Operation.LOOKUP_ACCOUNTS, w.accounts + [w.prefix | 999])),
        "transfers": _records(c._call(Operation.LOOKUP_TRANSFERS, w.transfer_ids)),
    }
    for aid in w.accounts:
        f = T.AccountFilter(aid, 0, 0, 0, 0, 0, 0, T.BATCH_MAX, both)
        out[f"history {aid & 0xFF}"] = [r[0] for r in _records(c._call(Operation.GET_ACCOUNT_TRANSFERS, f))]
        out[f"balances {aid & 0xFF}"] = [row[:4] for row in c._call(Operation.GET_ACCOUNT_BALANCES, f)]
        f = T.AccountFilter(aid, 0, 0, 0, 0, 0, 0, 3, both | T.AccountFilterFlags.REVERSED)
        out[f"newest {aid & 0xFF}"] = [r[0] for r in _records(c._call(Operation.GET_ACCOUNT_TRANSFERS, f))]
    for ledger in w.ledgers:
        q = T.QueryFilter(0, 0, 0, ledger, 0, 0, 0, T.BATCH_MAX, T.QueryFilterFlags.NONE)
        out[f"query accounts {ledger}"] = [r[0] for r in _records(c._call(Operation.QUERY_ACCOUNTS, q))]
        out[f"query transfers {ledger}"] = [r[0] for r in _records(c._call(Operation.QUERY_TRANSFERS, q))]
    return out


def run_seed(seed: int, sides: list[Side], report: Report, *, nonce: int, imported: bool, batches: int) -> None:
    """Send one seed's batches to every side and record each difference."""
    try:
        _run_seed(seed, sides, report, nonce=nonce, imported=imported, batches=batches)
    except Exception as e:  # a side that raises on a batch another answers is a difference too
        report.differences.append(f"seed {seed}: {type(e).__name__}: {e}")


def _run_seed(seed: int, sides: list[Side], report: Report, *, nonce: int, imported: bool, batches: int) -> None:
    w = World(seed, nonce, imported=imported, sharded=any(s.name == "sharded" for s in sides))
    ref = sides[0]
    for side in sides:
        side.mark(w)
        side.sync()
    for k, b in enumerate(w.batches(batches)):
        answers = [s.run(b) for s in sides]
        report.batches += 1
        report.events += len(b.events)
        enum = CT if b.kind == "transfers" else CA
        for st in answers[0][0]:
            report.statuses[enum(st).name] += 1
        for s, (status, shape, _) in zip(sides[1:], answers[1:]):
            if status != answers[0][0]:
                i = next(i for i, (x, y) in enumerate(zip(status, answers[0][0])) if x != y)
                report.differences.append(f"seed {seed} batch {k} event {i} ({b.kind} {b.events[i]}): {ref.name} "
                                          f"{enum(answers[0][0][i]).name}, {s.name} {enum(status[i]).name}")
                return
            mine, theirs = (shape, answers[0][1]) if s.exact and ref.exact else (_coarse(shape),
                                                                                 _coarse(answers[0][1]))
            if mine != theirs:
                report.differences.append(f"seed {seed} batch {k}: result timestamps {ref.name} {theirs}, "
                                          f"{s.name} {mine}")
                return
    states = [_state(s, w) for s in sides]
    for s, state in zip(sides[1:], states[1:]):
        for key, value in states[0].items():
            if state[key] != value:
                report.differences.append(f"seed {seed}: {key}: {ref.name} {value}, {s.name} {state[key]}")
                break


def run(seeds: range, *, tigerbeetle: str | None = None, address: str | None = None, sharded: bool = True,
        batches: int = 16, deadline_s: float | None = None,
        progress: Callable[[Report], None] | None = None) -> Report:
    """Run ``seeds`` over the embedded engine, a 4-shard ledger (seeds without imported events) and a real
    TigerBeetle replica: the one at ``address``, or one started from the binary ``tigerbeetle``; either may be
    None (no cluster). Seeds stop being started after ``deadline_s`` (from when the replica answers)."""
    from blazil_ai.ledger import connect
    from blazil_ai.ledger.tigerbeetle_replica import TigerBeetleReplica

    report = Report()
    nonce = random.Random(time.time_ns()).randrange(1, 1 << 40)
    with tempfile.TemporaryDirectory(prefix="blazil-diff-") as tmp:
        replica = TigerBeetleReplica(tigerbeetle, f"{tmp}/tb") if tigerbeetle and not address else None
        address = replica.address if replica else address
        cluster = connect(f"tigerbeetle://{address}") if address else None
        t0 = time.monotonic()
        try:
            for seed in seeds:
                if deadline_s is not None and time.monotonic() - t0 > deadline_s:
                    break
                imported = seed % 3 == 0 or not sharded
                with connect(f"{tmp}/e{seed}", fsync=False, create=True) as emb:
                    sides = [Side("embedded", emb, True)]
                    if cluster is not None:
                        sides.append(Side("tigerbeetle", cluster, True))
                    if sharded and not imported:
                        with connect(f"{tmp}/s{seed}", shards=SHARDS, fsync=False, create=True) as sh:
                            run_seed(seed, [*sides, Side("sharded", sh, False)], report, nonce=nonce,
                                     imported=False, batches=batches)
                    else:
                        run_seed(seed, sides, report, nonce=nonce, imported=imported, batches=batches)
                report.seeds += 1
                _cleanup(tmp, seed)
                if progress is not None:
                    progress(report)
        finally:
            if cluster is not None:
                cluster.close()
            if replica is not None:
                replica.close()
    return report


def _cleanup(tmp: str, seed: int) -> None:
    import shutil
    for d in (f"{tmp}/e{seed}", f"{tmp}/s{seed}"):
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blazil_ai.ledger.differential",
                                description="Send the same random batches to the embedded engine, a sharded ledger "
                                            "and a real TigerBeetle replica; report every difference.")
    p.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--batches", type=int, default=16, help="batches per seed (default 16)")
    p.add_argument("--tigerbeetle", help="TigerBeetle server binary (a replica is formatted in a temp dir)")
    p.add_argument("--address", help="host:port of a running TigerBeetle replica to use instead")
    p.add_argument("--no-sharded", action="store_true", help="leave the sharded ledger out")
    p.add_argument("--max-seconds", type=float, help="stop starting seeds after this long")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    def progress(r: Report) -> None:
        if not args.json and r.seeds % 50 == 0:
            print(f"{r.seeds} seeds, {r.events} events, {len(r.differences)} differences", file=sys.stderr)
    rep = run(range(args.first_seed, args.first_seed + args.seeds), tigerbeetle=args.tigerbeetle, address=args.address,
              sharded=not args.no_sharded, batches=args.batches, deadline_s=args.max_seconds, progress=progress)
    out = rep.as_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"seeds {out['seeds']}, batches {out['batches']}, events {out['events']}, "
              f"differences {out['differences']}, statuses seen {out['distinct_statuses']}")
        for d in rep.differences[:10]:
            print("  " + d)
    return 1 if rep.differences else 0


if __name__ == "__main__":
    sys.exit(main())
