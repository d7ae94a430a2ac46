"""Nothing acknowledged is lost: a real service process is killed with SIGKILL mid-stream and restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from blazil_ai.fraud import FraudService, Outcome

CHILD = textwrap.dedent("""
    import sys
    from blazil_ai.fraud import FraudService
    from blazil_ai.fraud.simulate import open_accounts, simulated_requests

    data, model = sys.argv[1], sys.argv[2]
    req, _ = simulated_requests(200_000, seed=21, fraud_rate=0.05)
    with FraudService(data, model, review_at=0.3, reject_at=0.8) as svc:
        open_accounts(svc.ledger, req)
        print("READY", flush=True)
        inflight = []
        for s in range(0, len(req), 500):
            inflight.append((s, svc.submit(req[s:s + 500])))
            while len(inflight) > 4 or (inflight and inflight[0][1].done()):
                start, fut = inflight.pop(0)
                res = fut.result()
                # Acknowledged: print each id with its outcome only now that it is durable.
                print("ACK", start, " ".join(map(str, res.outcome.tolist())), flush=True)
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    out = tmp_path_factory.mktemp("fraud-model")
    return train_fraud_model(_write_features(out, seed=0, n=4000), out / "models", seed=0)


def test_kill_9_loses_nothing_acknowledged(tmp_path, model, repo_root):
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(model)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    acked: dict[int, int] = {}
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        for line in proc.stdout:
            if line.startswith("ACK"):
                _, start, *outcomes = line.split()
                for k, o in enumerate(outcomes):
                    acked[int(start) + k + 1] = int(o)  # ids start at 1
            if len(acked) >= 6000 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)  # while later batches are in flight
    finally:
        proc.kill()
        proc.wait()
    assert len(acked) >= 6000, proc.stderr.read() if proc.stderr else ""

    with FraudService(data, model, review_at=0.3, reject_at=0.8) as svc:
        rec = svc.recovered
        ids = list(acked)
        for tid in ids:
            d = svc.decision(tid)
            assert d is not None, f"acknowledged transfer {tid} has no decision after the restart"
            assert d.outcome == Outcome(acked[tid]).name.lower()
        in_ledger = {t.id for t in svc.ledger.lookup_transfers(ids)}
        for tid in ids:
            if acked[tid] in (Outcome.APPROVED, Outcome.REVIEW):
                assert tid in in_ledger, f"acknowledged transfer {tid} missing from the ledger"
            else:
                assert tid not in in_ledger
        # Every decision kept (acknowledged or not) agrees with the ledger; the rest were withdrawn.
        rows = svc.store.rows[: svc.store.n]
        live = rows[np.isin(rows["outcome"], (Outcome.APPROVED, Outcome.REVIEW))]
        kept = [int(lo) for lo in live["id"][:, 0].tolist()]
        assert len({t.id for t in svc.ledger.lookup_transfers(kept)}) == len(kept)
        assert rec["history_transfers"] >= sum(o in (1, 2) for o in acked.values())
        totals = svc.ledger.backend.call("totals")
        assert totals["debits_posted"] == totals["credits_posted"]
        # The restarted service keeps deciding, with the rebuilt history.
        from blazil_ai.fraud.simulate import simulated_requests
        more, _ = simulated_requests(300, seed=22, id_base=10**9)
        from blazil_ai.fraud.simulate import open_accounts
        open_accounts(svc.ledger, more)
        assert svc.decide(more).outcome.all()
