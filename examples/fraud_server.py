"""The fraud service over TCP: start 'blazil serve' in process, then use the client as another program would.

Run: python examples/fraud_server.py
Same thing from a shell:
  blazil serve --data ./fraud-data --model ~/.cache/blazil/models/fraud.onnx
  blazil transfer accounts 1 2 && blazil transfer submit --from 1 --to 2 --amount 2599 --channel online
"""

from __future__ import annotations

import tempfile
import threading
import urllib.request
from pathlib import Path

from blazil_ai.datasets.samples import _write_features
from blazil_ai.fraud.server import FraudClient, FraudServer
from blazil_ai.fraud.simulate import simulated_requests
from blazil_ai.models.fraud import train_fraud_model

with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    model = train_fraud_model(_write_features(work, seed=0, n=10_000), work / "models", seed=0)
    server = FraudServer(work / "data", model, "tcp://127.0.0.1:0", metrics_port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"serving on {server.uri}, metrics at {server.metrics.url if server.metrics else '-'}")
    req, _ = simulated_requests(5_000, seed=9, fraud_rate=0.05)
    with FraudClient(server.uri) as client:
        accounts = sorted(set(req["debit_account_id"].tolist()) | set(req["credit_account_id"].tolist()))
        client.create_accounts(accounts)
        result = client.decide(req)
        print("decisions:", result.counts())
        first = int(req["id"][0, 0])
        print("decision of the first transfer:", client.decision(first))
        print("stats:", client.stats()["counts"])
    if server.metrics is not None:
        with urllib.request.urlopen(server.metrics.url) as r:
            print("\n".join(ln for ln in r.read().decode().splitlines() if ln.startswith("blazil_fraud_decisions")))
    server.stop()
    thread.join()
    server.close()
