"""Fraud-scored transfers/s end to end on the embedded ledger, against the same transfers unscored, same run.

Requests come from the transaction simulator (blazil_ai.datasets.transactions: realistic amounts, contexts,
velocity and fraud incidents, so the model sees inputs like those it was trained on); ``--requests random``
uses independent random columns instead.

Cases (N transfers over 10,000 accounts, batches of 8189, 8 batches in flight, fsync before every ack):
  scored     FraudService.submit: ring buffer -> velocity features -> ONNX fraud model (MLP, onnxruntime)
             -> thresholds -> decision log (fsync) -> embedded ledger (its WAL, fsync) -> ack
  unscored   (anchor) the same transfers, as the scored run sends them to the ledger (posted or pending), straight
             into a fresh embedded ledger with create_transfers_async, same batch size and depth

Each round runs both on fresh directories, alternating which goes first; medians over rounds are reported.
Decision latency is submit -> acknowledgement of each batch (every transfer in a batch waits for all of it);
at full load it is mostly queueing behind the batches in flight, so a light-load case (batches of 64, one
in flight, scored and unscored) reports the service's own latency too.
One JSON line per case, then one with both figures and their ratio. ``cpu_us_per_transfer`` is the process's CPU
time (all threads) per transfer: steadier than the rate on a busy machine, and what the two cases add up to.

    python benchmarks/fraud.py                # 1,000,000 transfers, 3 rounds
    python benchmarks/fraud.py --quick        # 200,000 transfers, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blazil_ai import ledger as L  # noqa: E402
from blazil_ai.fraud import FraudService, Outcome  # noqa: E402
from blazil_ai.fraud.simulate import open_accounts, push_stream  # noqa: E402
from blazil_ai.fraud.types import REQUEST_DTYPE, VOCAB  # noqa: E402
from blazil_ai.ledger.types import TransferFlags  # noqa: E402

BATCH = 8189


def make_requests(n: int, n_accounts: int, seed: int) -> np.ndarray:
    """``n`` card-like requests (log-normal amounts, random context) in time order."""
    rng = np.random.default_rng(seed)
    r = np.zeros(n, dtype=REQUEST_DTYPE)
    r["id"][:, 0] = np.arange(1, n + 1, dtype=np.uint64)
    r["id"][:, 1] = 1
    r["debit_account_id"] = rng.integers(2, n_accounts + 2, n)
    r["credit_account_id"] = 1
    r["amount"] = np.maximum(1, np.exp(rng.normal(8.0, 0.8, n))).astype(np.uint64)  # ~30 in cents * 100
    r["time"] = 1_767_225_600.0 + np.sort(rng.uniform(0, 14 * 86400, n))
    r["ledger"], r["code"] = 1, 1
    for name, vocab in VOCAB.items():
        r[name] = rng.integers(0, len(vocab), n)
    r["is_foreign"] = rng.random(n) < 0.03
    r["is_new_device"] = rng.random(n) < 0.02
    return r


def simulated(n: int, n_accounts: int, seed: int) -> np.ndarray:
    """``n`` requests from the transaction simulator (3% fraud), over ``n_accounts`` paying accounts."""
    from blazil_ai.fraud.simulate import simulated_requests

    return simulated_requests(n, seed=seed, fraud_rate=0.03, n_accounts=n_accounts)[0]


def train_model(out: Path) -> Path:
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    return train_fraud_model(_write_features(out, seed=0, n=20_000), out / "models", seed=0)


def run_scored(model: Path, req: np.ndarray, root: Path, depth: int, batch: int = BATCH) -> dict:
    d = Path(tempfile.mkdtemp(dir=root))
    try:
        with FraudService(d, model, review_at=0.5, reject_at=0.9) as svc:
            open_accounts(svc.ledger, req)
            svc.decide(req[:0])  # threads up
            cpu = time.process_time()
            outcome, _, wall, lat = push_stream(svc.submit, req, batch=batch, in_flight=depth)
            cpu = time.process_time() - cpu
            stage = {}
            from blazil_ai import metrics

            for line in metrics.render().decode().splitlines():
                if line.startswith("blazil_fraud_stage_latency_seconds_sum"):
                    stage[line.split('stage="')[1].split('"')[0]] = float(line.split()[-1])
        return {"wall": wall, "lat": lat, "outcome": outcome, "stage_sums": stage, "cpu": cpu}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_unscored(req: np.ndarray, sent: np.ndarray, root: Path, depth: int, batch: int = BATCH) -> dict:
    d = Path(tempfile.mkdtemp(dir=root))
    try:
        tr = np.zeros(len(req), dtype=L.TRANSFER_DTYPE)
        tr["id"] = req["id"]
        tr["debit_account_id"][:, 0] = req["debit_account_id"]
        tr["credit_account_id"][:, 0] = req["credit_account_id"]
        tr["amount"][:, 0] = req["amount"]
        tr["ledger"], tr["code"] = req["ledger"], req["code"]
        tr["user_data_64"] = np.round(req["time"] * 1e6).astype(np.uint64)
        review = sent == Outcome.REVIEW
        tr["flags"] = np.where(review, np.uint16(TransferFlags.PENDING), np.uint16(0))
        tr["timeout"] = np.where(review, np.uint32(3600), np.uint32(0))
        tr = tr[sent != Outcome.REJECTED]  # what the scored run hands to the ledger
        with L.connect(d, create=True) as client:
            open_accounts(client, req)
            lat = []
            t0, cpu = time.perf_counter(), time.process_time()
            pending: list = []
            for s in range(0, len(tr), batch):
                pending.append((time.perf_counter(), client.create_transfers_async(tr[s:s + batch])))
                while len(pending) >= depth or (pending and pending[0][1].done()):
                    t, f = pending.pop(0)
                    assert not f.result().any()
                    lat.append(time.perf_counter() - t)
            for t, f in pending:
                assert not f.result().any()
                lat.append(time.perf_counter() - t)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
        return {"wall": wall, "lat": np.array(lat), "n": len(tr), "cpu": cpu}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=8, help="batches in flight")
    p.add_argument("--model", help="fraud.onnx to use (default: train one on 20,000 simulated rows)")
    p.add_argument("--dir", help="where the ledgers go (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="200,000 transfers, 1 round")
    p.add_argument("--requests", choices=("simulated", "random"), default="simulated",
                   help="transaction simulator (default) or independent random columns")
    a = p.parse_args()
    if a.quick:
        a.n, a.rounds = 200_000, 1
    root = Path(a.dir or tempfile.mkdtemp(prefix="blazil-fraud-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else train_model(root / "model")
    req = (simulated if a.requests == "simulated" else make_requests)(a.n, a.accounts, seed=0)
    scored, unscored, p99, p50, stages, cpu_s, cpu_u = [], [], [], [], [], [], []
    outcome = None
    for r in range(a.rounds):
        order = ("scored", "unscored") if r % 2 == 0 else ("unscored", "scored")
        for case in order:
            if case == "scored":
                res = run_scored(model, req, root, a.depth)
                outcome = res["outcome"]
                scored.append(a.n / res["wall"])
                p99.append(float(np.percentile(res["lat"], 99)) * 1e3)
                p50.append(float(np.percentile(res["lat"], 50)) * 1e3)
                stages.append(res["stage_sums"])
                cpu_s.append(res["cpu"] / a.n * 1e6)
            else:
                if outcome is None:  # the anchor sends what the scored run sent; score once to know it
                    outcome = run_scored(model, req[: min(len(req), 2 * BATCH)], root, a.depth)["outcome"]
                    outcome = np.resize(outcome, len(req))
                u = run_unscored(req, outcome, root, a.depth)
                unscored.append(a.n / u["wall"])
                cpu_u.append(u["cpu"] / a.n * 1e6)
    # Light load: one small batch at a time, so latency is the service's own, not queueing behind others.
    small = req[: 200 * 64]
    light_s = run_scored(model, small, root, 1, batch=64)
    light_u = run_unscored(small, light_s["outcome"], root, 1, batch=64)
    if a.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    assert outcome is not None
    counts = {o.name.lower(): int((outcome == o.value).sum()) for o in Outcome}
    host = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
            "note": "shared 2-core machine, other work running"}
    sm, um = statistics.median(scored), statistics.median(unscored)
    print(json.dumps({"case": "scored", "transfers": a.n, "transfers_per_s": round(sm), "rounds": scored,
                      "p50_decision_latency_ms": round(statistics.median(p50), 2),
                      "p99_decision_latency_ms": round(statistics.median(p99), 2), "decisions": counts,
                      "batch": BATCH, "in_flight": a.depth, "requests": a.requests,
                      "cpu_us_per_transfer": round(statistics.median(cpu_s), 3)}))
    print(json.dumps({"case": "unscored (anchor)", "transfers": a.n, "transfers_per_s": round(um),
                      "rounds": unscored, "cpu_us_per_transfer": round(statistics.median(cpu_u), 3)}))
    print(json.dumps({"case": "light load, batches of 64, one in flight",
                      "scored_p50_ms": round(float(np.percentile(light_s["lat"], 50)) * 1e3, 2),
                      "scored_p99_ms": round(float(np.percentile(light_s["lat"], 99)) * 1e3, 2),
                      "unscored_p50_ms": round(float(np.percentile(light_u["lat"], 50)) * 1e3, 2),
                      "unscored_p99_ms": round(float(np.percentile(light_u["lat"], 99)) * 1e3, 2)}))
    print(json.dumps({"case": "scored_vs_unscored", "scored_per_s": round(sm), "unscored_per_s": round(um),
                      "ratio": round(sm / um, 3), "goal": {"scored_per_s": 500_000, "ratio": 0.7},
                      "p99_decision_latency_ms": round(statistics.median(p99), 2), "host": host}))


if __name__ == "__main__":
    main()
