"""Ledger throughput: durable transfers/s and batch latency, with its anchors measured in the same run.

Cases (1,000,000 transfers over 10,000 accounts, batches of 8189, fsync before every ack):
  numpy path, 1 shard      create_transfers(TRANSFER_DTYPE batch), one batch at a time (numpy1), and
                           with --depth batches in flight through create_transfers_async (numpy1p)
  numpy path, 2 shards     accounts partitioned by shard, each transfer within one shard
  cross-shard, 2 shards    every transfer crosses shards (two-phase commit through clearing accounts)
  dataclass path, 1 and 2  create_transfers(list[Transfer]) as with the official client, one batch at a time
On a TigerBeetle cluster (a single replica started from --tigerbeetle, default BLAZIL_TIGERBEETLE_BIN or
../shared/tigerbeetle/tigerbeetle; --tb-transfers transfers over 10,000 accounts, batches of 8189):
  tb_official              the official client's own path: tigerbeetle.ClientSync.create_transfers(list of
                           tigerbeetle.Transfer), one batch at a time (the objects exist before timing starts)
  tb_fast                  our fast path: numpy batches to the official package's native library as one buffer
                           each, --tb-depth batches in flight (connect("tigerbeetle://...").create_transfers_async)
  (each client registers its session with one lookup before timing starts: the first request of a session
  takes about 0.6 s on this VM)
  tb_benchmark             the ceiling: `tigerbeetle benchmark --addresses=<the same replica>` (TigerBeetle's own
                           native load generator), its "load accepted" and batch latencies
Anchors:
  fsync                    the bare write(1 MiB) + fdatasync rate of the data directory (the disk's ceiling
                           for one fsync per batch: rate x 8189 transfers/s)
  python loop              a straightforward per-transfer Python loop (dict of balances, duplicate-id set,
                           one write + fdatasync per batch)

A one-shard ledger is opened with capacity for every transfer of its run: its storage is allocated and mapped
at open, as TigerBeetle allocates at start-up, outside the timed part (``open_and_preallocate_s`` says how long
opening took). Sharded ledgers start at the default capacity and double as they fill, inside the timed part.

Runs are interleaved (case order rotates each round) and medians are reported. One JSON line per case.

    python benchmarks/ledger.py                 # the full run
    python benchmarks/ledger.py --quick         # 200k transfers, 1 round
    python benchmarks/ledger.py --cases tb_official,tb_fast,tb_benchmark --rounds 3   # the cluster cases
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blazil_ai import ledger as L  # noqa: E402
from blazil_ai.ledger.shards import shard_of  # noqa: E402

BATCH = 8189


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def make_batches(n: int, n_accounts: int, seed: int, id_base: int, groups: list[np.ndarray] | None = None,
                 cross: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, BATCH):
        m = min(BATCH, n - start)
        b = np.zeros(m, dtype=L.TRANSFER_DTYPE)
        b["id"][:, 0] = np.arange(start, start + m, dtype=np.uint64) + 1
        b["id"][:, 1] = id_base
        if cross is not None:
            a, c = cross
            dr, cr = rng.choice(a, m), rng.choice(c, m)
        elif groups is not None:
            g = groups[rng.integers(len(groups))]
            dr = rng.choice(g, m)
            cr = rng.choice(g, m)
            same = dr == cr
            cr[same] = g[(np.searchsorted(g, cr[same]) + 1) % len(g)]
        else:
            dr = rng.integers(1, n_accounts + 1, m)
            cr = (dr + rng.integers(1, n_accounts, m) - 1) % n_accounts + 1
        b["debit_account_id"][:, 0] = dr
        b["credit_account_id"][:, 0] = cr
        b["amount"][:, 0] = rng.integers(1, 1000, m)
        b["ledger"], b["code"] = 1, 1
        out.append(b)
    return out


def open_ledger(root: Path, shards: int, n_accounts: int, capacity: int) -> L.LedgerClient:
    if root.exists():
        shutil.rmtree(root)
    c = L.connect(root, create=True, **({"shards": shards} if shards > 1 else {"capacity": capacity}))
    open_accounts(c, n_accounts, 0)
    return c


def run_numpy(root: Path, batches: list[np.ndarray], shards: int, n_accounts: int, depth: int) -> dict[str, float]:
    t0 = time.perf_counter()  # opening preallocates (and maps) storage for every transfer of the run
    c = open_ledger(root, shards, n_accounts, capacity=sum(len(b) for b in batches) + BATCH)
    opened = time.perf_counter() - t0
    try:
        return {**run_numpy_on(c, batches, depth), "open": opened}
    finally:
        c.close()


def run_numpy_on(c: L.LedgerClient, batches: list[np.ndarray], depth: int) -> dict[str, float]:
    """Send numpy batches with ``depth`` in flight; wall and CPU time, batch latency percentiles."""
    lat: list[float] = []
    inflight: list[tuple[float, object]] = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for b in batches:
        inflight.append((time.perf_counter(), c.create_transfers_async(b)))
        if len(inflight) >= depth:
            ts, f = inflight.pop(0)
            st = f.result()  # type: ignore[attr-defined]
            lat.append(time.perf_counter() - ts)
            assert (st == 0).all(), np.unique(st)
    for ts, f in inflight:
        st = f.result()  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - ts)
        assert (st == 0).all(), np.unique(st)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"seconds": dt, "cpu": cpu, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


def run_dataclass(root: Path, batches: list[np.ndarray], n_accounts: int, shards: int = 1) -> dict[str, float]:
    lists = [L.array_to_transfers(b) for b in batches]  # the caller's objects exist before timing starts
    c = open_ledger(root, shards, n_accounts, capacity=sum(len(b) for b in batches) + BATCH)
    try:
        return run_lists(c.create_transfers, lists, L.CreateTransferStatus.CREATED)
    finally:
        c.close()


def run_lists(create: Callable[[list[Any]], list[Any]], lists: list[list[Any]], created: Any) -> dict[str, float]:
    """Send lists of transfer objects one request at a time; wall and CPU time, batch latency percentiles."""
    lat = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for items in lists:
        ts = time.perf_counter()
        res = create(items)
        lat.append(time.perf_counter() - ts)
        assert res[-1].status == created
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"seconds": dt, "cpu": cpu, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


def tb_binary(arg: str | None) -> str | None:
    cand = arg or os.environ.get("BLAZIL_TIGERBEETLE_BIN") or \
        str(Path(__file__).resolve().parent.parent.parent / "shared" / "tigerbeetle" / "tigerbeetle")
    return cand if Path(cand).is_file() else None


def tb_batches(batches: list[np.ndarray], id_hi: int, acct_hi: int) -> list[np.ndarray]:
    """Copies of ``batches`` with transfer ids of their own (high word ``id_hi``) between the cluster's accounts."""
    out = []
    for b in batches:
        b = b.copy()
        b["id"][:, 1] = id_hi
        b["debit_account_id"][:, 1] = acct_hi
        b["credit_account_id"][:, 1] = acct_hi
        out.append(b)
    return out


def open_accounts(client: L.LedgerClient, n_accounts: int, acct_hi: int) -> None:
    """Accounts 1..n_accounts (high word ``acct_hi``) on ledger 1."""
    accs = np.zeros(n_accounts, dtype=L.ACCOUNT_DTYPE)
    accs["id"][:, 0] = np.arange(1, n_accounts + 1)
    accs["id"][:, 1] = acct_hi
    accs["ledger"], accs["code"] = 1, 1
    for k in range(0, n_accounts, BATCH):
        assert (client.create_accounts(accs[k: k + BATCH]) == 0).all()


def run_tb_official(address: str, batches: list[np.ndarray]) -> dict[str, float]:
    import tigerbeetle as tb

    lists = [[tb.Transfer(**{k: getattr(t, k) for k in t.__slots__ if k != "flags"}, flags=tb.TransferFlags(0))
              for t in L.array_to_transfers(b)] for b in batches]  # the caller's objects exist before timing
    with tb.ClientSync(cluster_id=0, replica_addresses=address) as c:
        c.lookup_accounts([1])  # registers the client's session (about 0.6 s here), as each path does before timing
        return run_lists(c.create_transfers, lists, tb.CreateTransferStatus.CREATED)


def run_tb_fast(address: str, batches: list[np.ndarray], depth: int) -> dict[str, float]:
    with L.connect(f"tigerbeetle://{address}") as c:
        c.lookup_accounts([1])  # session registration, outside the timing as for the official client
        return run_numpy_on(c, batches, depth)


def run_tb_benchmark(binary: str, address: str, transfers: int, n_accounts: int) -> dict[str, float]:
    out = subprocess.run([binary, "benchmark", f"--addresses={address}", f"--transfer-count={transfers}",
                          f"--account-count={n_accounts}", "--query-count=0"],
                         capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    rate = re.search(r"load accepted = (\d+) tx/s", text)
    p50 = re.search(r"batch latency p50\s*= (\d+) ms", text)
    p99 = re.search(r"batch latency p99\s*= (\d+) ms", text)
    if out.returncode != 0 or not (rate and p50 and p99):
        raise RuntimeError(f"tigerbeetle benchmark failed ({out.returncode}): {text[-800:]}")
    return {"seconds": transfers / int(rate.group(1)), "cpu": float("nan"), "p50": int(p50.group(1)) / 1e3,
            "p99": int(p99.group(1)) / 1e3}


def anchor_fsync(root: Path, rounds: int = 60) -> float:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fsync-probe"
    buf = os.urandom(BATCH * 128)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(rounds):
            os.write(fd, buf)
            os.fdatasync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return rounds / dt


def anchor_loop(root: Path, batches: list[np.ndarray], n_accounts: int) -> tuple[float, float]:
    """A plain Python ledger: per transfer, check and update dict balances; per batch, one write + fsync."""
    root.mkdir(parents=True, exist_ok=True)
    debits = {i: 0 for i in range(1, n_accounts + 1)}
    credits = dict(debits)
    seen: set[int] = set()
    rows = [(b["id"][:, 0].tolist(), b["debit_account_id"][:, 0].tolist(), b["credit_account_id"][:, 0].tolist(),
             b["amount"][:, 0].tolist(), b.tobytes()) for b in batches]
    fd = os.open(root / "loop.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        for ids, drs, crs, amts, raw in rows:
            for tid, dr, cr, amt in zip(ids, drs, crs, amts):
                if tid in seen or dr not in debits or cr not in credits or dr == cr:
                    continue
                seen.add(tid)
                debits[dr] += amt
                credits[cr] += amt
                n += 1
            os.write(fd, raw)
            os.fdatasync(fd)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        os.close(fd)
    return n / dt, n / cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transfers", type=int, default=1_000_000)
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--depth", type=int, default=4, help="batches in flight for numpy1p and numpy2")
    ap.add_argument("--loop-transfers", type=int, default=200_000, help="transfers for the Python-loop anchor")
    ap.add_argument("--cross-transfers", type=int, default=3 * BATCH, help="transfers for the cross-shard case")
    ap.add_argument("--dataclass-transfers", type=int, default=None, help="default: --transfers")
    ap.add_argument("--data-dir", default=None, help="where the ledgers are written (default: a temp dir)")
    ap.add_argument("--cases", default="numpy1,numpy1p,numpy2,cross2,dataclass1,dataclass2")
    ap.add_argument("--quick", action="store_true", help="200k transfers, one round")
    ap.add_argument("--tigerbeetle", help="TigerBeetle server binary for the tb_* cases (default: "
                                          "BLAZIL_TIGERBEETLE_BIN, else ../shared/tigerbeetle/tigerbeetle)")
    ap.add_argument("--tb-transfers", type=int, default=30 * BATCH, help="transfers per tb_* case and round")
    ap.add_argument("--tb-depth", type=int, default=8, help="batches in flight for tb_fast")
    ap.add_argument("--switch-interval", type=float, default=0.0002,
                    help="sys.setswitchinterval for this process, as `blazil ledger serve` sets it (Python's "
                         "default is 0.005)")
    args = ap.parse_args()
    sys.setswitchinterval(args.switch_interval)
    if args.quick:
        args.transfers, args.rounds, args.loop_transfers = 200_000, 1, 50_000
    base = Path(args.data_dir or tempfile.mkdtemp(prefix="blazil-ledger-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    n_acc = args.accounts
    main_batches = make_batches(args.transfers, n_acc, 1, 0)
    n_dc = args.dataclass_transfers or args.transfers
    dc_batches = main_batches[: (n_dc + BATCH - 1) // BATCH]
    acc_ids = np.arange(1, n_acc + 1)
    owner = np.array([shard_of(int(i), 2) for i in acc_ids])
    groups = [acc_ids[owner == s] for s in range(2)]
    part_batches = make_batches(args.transfers, n_acc, 2, 0, groups=groups)
    cross_batches = make_batches(args.cross_transfers, n_acc, 3, 0, cross=(groups[0], groups[1]))
    loop_batches = main_batches[: max(1, args.loop_transfers // BATCH)]

    replica = None
    tb_cases = [c for c in cases if c.startswith("tb_")]
    if tb_cases:
        from blazil_ai.ledger.tigerbeetle_replica import TigerBeetleReplica
        binary = tb_binary(args.tigerbeetle)
        if binary is None:
            print("benchmarks/ledger.py: no TigerBeetle server binary (--tigerbeetle or BLAZIL_TIGERBEETLE_BIN)",
                  file=sys.stderr)
            return 2
        replica = TigerBeetleReplica(binary, base / "tigerbeetle")
        acct_hi = int(np.random.default_rng().integers(1, 1 << 62))
        with L.connect(f"tigerbeetle://{replica.address}") as c:
            open_accounts(c, n_acc, acct_hi)
        tb_source = make_batches(args.tb_transfers, n_acc, 4, 0)
        id_hi = iter(range(int(np.random.default_rng().integers(1, 1 << 60)), 1 << 62))
    results: dict[str, list[dict[str, float]]] = {c: [] for c in cases}
    fsync_rates: list[float] = []
    loop_rates: list[float] = []
    loop_cpu_rates: list[float] = []
    for r in range(args.rounds):
        order = cases[r % len(cases):] + cases[: r % len(cases)]
        fsync_rates.append(anchor_fsync(base / "anchor"))
        wall_rate, cpu_rate = anchor_loop(base / "anchor", loop_batches, n_acc)
        loop_rates.append(wall_rate)
        loop_cpu_rates.append(cpu_rate)
        for case in order:
            root = base / case
            if case == "numpy1":
                results[case].append(run_numpy(root, main_batches, 1, n_acc, 1))
            elif case == "numpy1p":
                results[case].append(run_numpy(root, main_batches, 1, n_acc, args.depth))
            elif case == "numpy2":
                results[case].append(run_numpy(root, part_batches, 2, n_acc, args.depth))
            elif case == "cross2":
                results[case].append(run_numpy(root, cross_batches, 2, n_acc, 1))
            elif case == "dataclass1":
                results[case].append(run_dataclass(root, dc_batches, n_acc))
            elif case == "dataclass2":
                results[case].append(run_dataclass(root, part_batches[: len(dc_batches)], n_acc, shards=2))
            elif case == "tb_official":
                assert replica is not None
                results[case].append(run_tb_official(replica.address, tb_batches(tb_source, next(id_hi), acct_hi)))
            elif case == "tb_fast":
                assert replica is not None
                results[case].append(run_tb_fast(replica.address, tb_batches(tb_source, next(id_hi), acct_hi),
                                                 args.tb_depth))
            elif case == "tb_benchmark":
                assert replica is not None
                results[case].append(run_tb_benchmark(binary, replica.address, args.tb_transfers, n_acc))
            shutil.rmtree(root, ignore_errors=True)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    fsync = statistics.median(fsync_rates)
    loop = statistics.median(loop_rates)
    loop_cpu = statistics.median(loop_cpu_rates)
    if replica is not None:
        replica.close()
    sizes = {"numpy1": args.transfers, "numpy1p": args.transfers, "numpy2": args.transfers,
             "cross2": args.cross_transfers, "tb_official": args.tb_transfers, "tb_fast": args.tb_transfers,
             "tb_benchmark": args.tb_transfers,
             "dataclass1": sum(len(b) for b in dc_batches), "dataclass2": sum(len(b) for b in dc_batches)}
    labels = {"numpy1": ("numpy", 1, 1), "numpy1p": ("numpy, pipelined", 1, args.depth),
              "numpy2": ("numpy", 2, args.depth),
              "cross2": ("numpy, every transfer cross-shard", 2, 1), "dataclass1": ("dataclass", 1, 1),
              "dataclass2": ("dataclass", 2, 1), "tb_official": ("official client (tigerbeetle.ClientSync)", 0, 1),
              "tb_fast": ("numpy to the native client library", 0, args.tb_depth),
              "tb_benchmark": ("tigerbeetle benchmark (native load generator)", 0, 0)}
    tb_rate = {c: statistics.median(sizes[c] / x["seconds"] for x in results[c]) for c in tb_cases}
    for case in tb_cases:
        runs = results[case]
        line: dict[str, object] = {
            "bench": "ledger", "case": case, "path": labels[case][0], "cluster": "tigerbeetle 0.17.9, 1 replica",
            "transfers": sizes[case], "accounts": n_acc, "batch": BATCH, "batches_in_flight": labels[case][2],
            "transfers_per_s": round(tb_rate[case]),
            "p50_batch_ms": round(statistics.median(x["p50"] for x in runs) * 1e3, 2),
            "p99_batch_ms": round(statistics.median(x["p99"] for x in runs) * 1e3, 2)}
        if "tb_official" in tb_rate:
            line["anchor_official_client_transfers_per_s"] = round(tb_rate["tb_official"])
            line["ratio_vs_official_client"] = round(tb_rate[case] / tb_rate["tb_official"], 2)
        if "tb_benchmark" in tb_rate:
            line["anchor_tigerbeetle_benchmark_transfers_per_s"] = round(tb_rate["tb_benchmark"])
            line["ratio_vs_tigerbeetle_benchmark"] = round(tb_rate[case] / tb_rate["tb_benchmark"], 2)
        if case == "tb_fast":
            line["goal"] = ">= 3x official client and >= 0.5x tigerbeetle benchmark"
            line["goal_met"] = bool(line.get("ratio_vs_official_client", 0) >= 3  # type: ignore[operator]
                                    and line.get("ratio_vs_tigerbeetle_benchmark", 0) >= 0.5)  # type: ignore[operator]
        line.update({"rounds": args.rounds, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})
        print(json.dumps(line), flush=True)
    for case in cases:
        if case in tb_cases:
            continue
        runs = results[case]
        tps = statistics.median(sizes[case] / x["seconds"] for x in runs)
        per_cpu = statistics.median(sizes[case] / x["cpu"] for x in runs)
        path, shards, depth = labels[case]
        print(json.dumps({
            "bench": "ledger", "case": case, "path": path, "shards": shards, "batches_in_flight": depth,
            "transfers": sizes[case], "accounts": n_acc, "batch": BATCH, "fsync_per_batch": True,
            "transfers_per_s": round(tps), "p50_batch_ms": round(statistics.median(x["p50"] for x in runs) * 1e3, 2),
            "open_and_preallocate_s": round(statistics.median(x.get("open", 0.0) for x in runs), 3),
            "p99_batch_ms": round(statistics.median(x["p99"] for x in runs) * 1e3, 2),
            "anchor_fsync_per_s": round(fsync, 1), "anchor_fsync_ceiling_transfers_per_s": round(fsync * BATCH),
            "anchor_python_loop_transfers_per_s": round(loop), "ratio_vs_python_loop": round(tps / loop, 2),
            # CPU time (all threads) is less sensitive than wall time to other processes on a busy machine.
            "transfers_per_cpu_s": round(per_cpu), "anchor_python_loop_transfers_per_cpu_s": round(loop_cpu),
            "cpu_ratio_vs_python_loop": round(per_cpu / loop_cpu, 2),
            "ratio_vs_fsync_ceiling": round(tps / (fsync * BATCH), 3),
            "goal_transfers_per_s": 1_000_000, "goal_p99_batch_ms": 20, "goal_cpu_ratio_vs_python_loop": 1.0,
            "goal_met": bool(case in ("numpy1", "numpy1p") and tps >= 1_000_000
                             and statistics.median(x["p99"] for x in runs) <= 0.020
                             and per_cpu / loop_cpu >= 1.0),
            "rounds": args.rounds, "filesystem": fs_type(base), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "switch_interval_s": args.switch_interval,
        }), flush=True)
    if args.data_dir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
