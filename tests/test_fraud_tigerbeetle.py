"""``blazil serve --ledger tigerbeetle://HOST:PORT``: the fraud-scored transfer path on a real TigerBeetle replica,
end to end (service process, client, decisions, reviews, restart), checked on the cluster itself."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from blazil_ai import ledger as L
from blazil_ai.fraud.server import FraudClient
from blazil_ai.fraud.simulate import simulated_requests


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    out = tmp_path_factory.mktemp("fraud-model")
    return train_fraud_model(_write_features(out, seed=0, n=4000), out / "models", seed=0)


def _serve(data, model, address, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", "serve", "--data", str(data), "--model", str(model),
                             "--ledger", f"tigerbeetle://{address}", "--listen", "tcp://127.0.0.1:0",
                             "--metrics-port", "0", "--review-at", "0.2", "--reject-at", "0.8", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"blazil serve did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_serve_on_a_tigerbeetle_cluster(tmp_path, model, tigerbeetle, repo_root):
    rng = random.Random()
    req, _ = simulated_requests(600, seed=7, fraud_rate=0.1)
    acct_base = rng.randrange(1 << 40, 1 << 50)
    req["debit_account_id"] += acct_base
    req["credit_account_id"] += acct_base
    req["id"][:, 1] = rng.randrange(1, 1 << 62)  # transfer ids of this run only
    proc, info = _serve(tmp_path / "data", model, tigerbeetle.address, repo_root)
    try:
        with FraudClient(info["listen"], timeout=60) as c:
            ids = np.unique(np.concatenate([req["debit_account_id"], req["credit_account_id"]])).tolist()
            assert (c.create_accounts(ids) == 0).all()
            res = [c.submit(req[s:s + 200]).result(60) for s in range(0, 600, 200)]
            outcome = np.concatenate([r.outcome for r in res])
            status = np.concatenate([r.ledger_status for r in res])
            assert {1, 2} <= set(outcome.tolist())
            tid = [int(lo) | (int(hi) << 64) for lo, hi in req["id"].tolist()]
            held = [tid[i] for i in np.nonzero(outcome == 2)[0][:2]]
            assert c.review(held[0], approve=True)["review_state"] == "posted"
            if len(held) > 1:
                assert c.review(held[1], approve=False)["review_state"] == "voided"
    finally:
        _stop(proc)
    with L.connect(f"tigerbeetle://{tigerbeetle.address}") as cluster:
        approved = [tid[i] for i in np.nonzero((outcome == 1) & (status == 0))[0]]
        rejected = [tid[i] for i in np.nonzero(outcome == 3)[0]]
        found = {t.id: t for t in cluster.lookup_transfers(approved + held + rejected)}
        assert all(i in found and not found[i].flags & L.TransferFlags.PENDING for i in approved)
        assert not any(i in found for i in rejected)  # rejected transfers never reach the ledger
        assert all(found[h].flags & L.TransferFlags.PENDING for h in held)  # held: a pending transfer each
        posts = cluster.query_transfers(L.QueryFilter(0, 0, 0, 1, 0, 0, 0, 8000, L.QueryFilterFlags.REVERSED))
        resolved = {t.pending_id: t.flags for t in posts if t.pending_id in held}
        assert resolved[held[0]] & L.TransferFlags.POST_PENDING_TRANSFER
        moved = sum(int(req["amount"][tid.index(i)]) for i in approved) + int(req["amount"][tid.index(held[0])])
        accounts = cluster.lookup_accounts(ids)
        assert sum(a.debits_posted for a in accounts) == moved == sum(a.credits_posted for a in accounts)
    # A restart checks the decision log against the cluster and keeps serving.
    proc, info = _serve(tmp_path / "data", model, tigerbeetle.address, repo_root)
    try:
        with FraudClient(info["listen"], timeout=60) as c:
            assert c.decision(held[0])["review_state"] == "posted"
            assert c.stats()["counts"]["approved"] == int((outcome == 1).sum())
    finally:
        _stop(proc)


def test_serve_names_a_dead_cluster(tmp_path, model, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "blazil_ai", "serve", "--data", str(tmp_path / "d"), "--model",
                           str(model), "--ledger", "tigerbeetle://", "--listen", "tcp://127.0.0.1:0",
                           "--metrics-port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "tigerbeetle://" in proc.stderr and "Traceback" not in proc.stderr
