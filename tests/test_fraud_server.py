"""``blazil serve`` and ``blazil transfer ...`` over real TCP on loopback, with /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

from blazil_ai.cli import main
from blazil_ai.errors import DataError
from blazil_ai.fraud.server import FraudClient, FraudServer
from blazil_ai.fraud.simulate import simulated_requests


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    out = tmp_path_factory.mktemp("fraud-model")
    return train_fraud_model(_write_features(out, seed=0, n=4000), out / "models", seed=0)


@pytest.fixture()
def server(tmp_path, model):
    srv = FraudServer(tmp_path / "data", model, "tcp://127.0.0.1:0", metrics_port=0, review_at=0.2, reject_at=0.8,
                      fsync=False)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.stop()
    t.join(5)
    srv.close()


def test_client_submits_reads_reviews_and_metrics_count(server):
    req, _ = simulated_requests(3000, seed=31, fraud_rate=0.06)
    with FraudClient(server.uri) as c:
        ids = np.unique(np.concatenate([req["debit_account_id"], req["credit_account_id"]])).tolist()
        for s in range(0, len(ids), 5000):
            assert (c.create_accounts(ids[s:s + 5000]) == 0).all()
        futs = [c.submit(req[s:s + 1000]) for s in range(0, 3000, 1000)]  # pipelined
        res = [f.result(30) for f in futs]
        outcome = np.concatenate([r.outcome for r in res])
        assert set(np.unique(outcome).tolist()) == {1, 2, 3}
        held = int(req["id"][int(np.argmax(outcome == 2)), 0])
        d = c.decision(held)
        assert d["outcome"] == "review" and d["review_state"] == "pending" and d["transfer_id"] == str(held)
        assert c.review(held, approve=True)["review_state"] == "posted"
        with pytest.raises(DataError, match="already posted"):
            c.review(held, approve=False)
        assert c.decision(10**25) is None
        listed = c.decisions(outcome="rejected", limit=5)
        assert len(listed) == 5 and all(x["outcome"] == "rejected" for x in listed)
        assert c.stats()["counts"]["approved"] == int((outcome == 1).sum())
    with urllib.request.urlopen(server.metrics.url, timeout=5) as r:
        text = r.read().decode()
    for name in ('blazil_fraud_decisions_total{outcome="approved"}', "blazil_fraud_score_ratio_bucket",
                 "blazil_fraud_decision_latency_seconds_bucket", 'blazil_fraud_stage_latency_seconds_bucket{'):
        assert name in text
    approved = [ln for ln in text.splitlines() if ln.startswith('blazil_fraud_decisions_total{outcome="approved"}')]
    assert float(approved[0].split()[-1]) >= int((outcome == 1).sum())


def test_transfer_cli_commands(server, capsys):
    uri = ["--connect", server.uri]
    assert main(["transfer", "accounts", *uri, "501", "502"]) == 0
    assert "account 501: created" in capsys.readouterr().out
    assert main(["transfer", "submit", *uri, "--json", "--id", "9001", "--from", "501", "--to", "502",
                 "--amount", "2599", "--merchant", "grocery", "--channel", "pos", "--device", "pos_terminal",
                 "--country", "US", "--time", "1767261600"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["transfer_id"] == "9001" and out["outcome"] in ("approved", "review", "rejected")
    assert main(["transfer", "decision", *uri, "9001"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("9001: ") and "model fraud.onnx@" in line
    assert main(["transfer", "decision", *uri, "12345"]) == 1
    assert "no decision for transfer 12345" in capsys.readouterr().err
    assert main(["transfer", "list", *uri, "--json", "--account", "501"]) == 0
    assert [d["transfer_id"] for d in json.loads(capsys.readouterr().out)] == ["9001"]
    assert main(["transfer", "submit", *uri, "--from", "501", "--to", "501", "--amount", "5"]) == 1
    assert "must differ" in capsys.readouterr().err
    bad = server.service.data.parent / "bad.jsonl"
    bad.write_text('{"debit_account_id": 501, "credit_account_id": 502, "amount": 10}\n{oops\n')
    assert main(["transfer", "submit", *uri, "--file", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err


def test_serve_refuses_to_start_without_a_model(tmp_path, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "blazil_ai", "serve", "--data", str(tmp_path / "d"), "--model",
                           str(tmp_path / "missing.onnx"), "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "missing.onnx not found" in proc.stderr and "does not start without a model" in proc.stderr


def test_serve_process_answers_the_transfer_command(tmp_path, model, repo_root):
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", "serve", "--data", str(tmp_path / "d"), "--model",
                             str(model), "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        uri = info["listen"]
        cli = [sys.executable, "-m", "blazil_ai", "transfer"]
        run = lambda *a: subprocess.run([*cli, *a, "--connect", uri], capture_output=True, text=True,  # noqa: E731
                                        timeout=60, env=env)
        assert run("accounts", "1", "2").returncode == 0
        r = run("submit", "--from", "1", "--to", "2", "--amount", "1000", "--json")
        assert r.returncode == 0, r.stderr
        tid = json.loads(r.stdout)["transfer_id"]
        assert json.loads(run("decision", tid, "--json").stdout)["transfer_id"] == tid
        with urllib.request.urlopen(info["metrics"], timeout=5) as resp:
            assert b"blazil_fraud_decisions_total" in resp.read()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


def test_cli_defaults_match_the_service_default_uri():
    from blazil_ai.cli import build_parser
    from blazil_ai.fraud.types import DEFAULT_URI

    p = build_parser()
    assert p.parse_args(["serve", "--data", "d", "--model", "m"]).listen == DEFAULT_URI
    assert p.parse_args(["transfer", "stats"]).connect == DEFAULT_URI
