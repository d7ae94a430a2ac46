"""Paging through every transfer by timestamp (what the fraud service does at start to rebuild its velocity
window), against the anchor: the per-page algorithm the engine used before (sort and mask the whole table for
every 8,189-row page), in the same run. Prints one JSON line per table size.

    python benchmarks/ledger_paging.py                    # 200k, 400k and 800k transfers
    python benchmarks/ledger_paging.py --sizes 1700000    # the size the issue measured (the anchor takes minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blazil_ai import ledger as L  # noqa: E402
from blazil_ai.ledger.engine import Engine, _common_mask  # noqa: E402


def build(n: int) -> Engine:
    eng = Engine(capacity=1 << 16)
    acc = np.zeros(1000, dtype=L.ACCOUNT_DTYPE)
    acc["id"][:, 0] = np.arange(1, 1001)
    acc["ledger"], acc["code"] = 1, 1
    eng.create_accounts(acc, eng.next_timestamps(1000))
    for k in range(0, n, L.BATCH_MAX):
        m = min(L.BATCH_MAX, n - k)
        b = np.zeros(m, dtype=L.TRANSFER_DTYPE)
        b["id"][:, 0] = np.arange(k, k + m) + 1
        b["debit_account_id"][:, 0] = np.arange(k, k + m) % 1000 + 1
        b["credit_account_id"][:, 0] = (np.arange(k, k + m) + 1) % 1000 + 1
        b["amount"][:, 0] = 1
        b["ledger"], b["code"] = 1, 1
        eng.create_transfers(b, eng.next_timestamps(m))
    return eng


def old_query(records: np.ndarray, f: L.QueryFilter) -> np.ndarray:
    """The engine's query before: argsort and mask the whole table for each page."""
    order = np.argsort(records["timestamp"], kind="stable")
    recs = records[order]
    rows = np.nonzero(_common_mask(recs, 0, 0, 0, 0, 0, f.timestamp_min, f.timestamp_max))[0]
    return recs[rows[: f.limit]].copy()


def page_all(query) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    cursor, total = 0, 0
    while True:
        page = query(L.QueryFilter(0, 0, 0, 0, 0, cursor, 0, L.BATCH_MAX, L.QueryFilterFlags.NONE))
        total += len(page)
        if len(page) < L.BATCH_MAX:
            return total, time.perf_counter() - t0
        cursor = int(page["timestamp"][-1]) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200000,400000,800000", help="transfer counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    args = ap.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        eng = build(n)
        table = eng.transfers[: eng.n_transfers]
        new_s, old_s = [], []
        for _ in range(args.rounds):
            got, t = page_all(eng.query_transfers)
            assert got == n
            new_s.append(t)
            got, t = page_all(lambda f, table=table: old_query(table, f))
            assert got == n
            old_s.append(t)
        new, old = statistics.median(new_s), statistics.median(old_s)
        print(json.dumps({"bench": "ledger_paging", "transfers": n, "pages": -(-n // L.BATCH_MAX),
                          "seconds": round(new, 4), "anchor_whole_table_per_page_seconds": round(old, 4),
                          "speedup_vs_anchor": round(old / new, 1), "rounds": args.rounds}), flush=True)


if __name__ == "__main__":
    main()
