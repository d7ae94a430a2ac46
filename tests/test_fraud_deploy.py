"""deploy/: the Prometheus config and Grafana dashboard parse, and every metric they use is one the service exports."""

from __future__ import annotations

import json
import re

import yaml

from blazil_ai import metrics
from blazil_ai.fraud import FraudService
from blazil_ai.fraud.simulate import open_accounts, simulated_requests


def test_prometheus_config_scrapes_the_serve_port(repo_root):
    cfg = yaml.safe_load((repo_root / "deploy" / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "blazil-fraud")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]  # blazil serve --metrics-port default
    rules = yaml.safe_load((repo_root / "deploy" / "alerts.yml").read_text())
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {"FraudModelErrors"}


def test_dashboard_and_alerts_use_exported_metrics(repo_root, tmp_path):
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    dash = json.loads((repo_root / "deploy" / "grafana" / "blazil-fraud-dashboard.json").read_text())
    assert dash["uid"] == "blazil-fraud" and len(dash["panels"]) >= 6
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in yaml.safe_load((repo_root / "deploy" / "alerts.yml").read_text())["groups"]
              for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"blazil_[a-z0-9_]+", e)}
    assert used

    model = train_fraud_model(_write_features(tmp_path, seed=0, n=3000), tmp_path / "m", seed=0)
    req, _ = simulated_requests(2000, seed=41, fraud_rate=0.08)
    with FraudService(tmp_path / "data", model, review_at=0.2, reject_at=0.8, fsync=False) as svc:
        open_accounts(svc.ledger, req)
        res = svc.decide(req)
        svc.review(int(req["id"][int((res.outcome == 2).argmax()), 0]), True)
    exported = set(re.findall(r"^(blazil_[a-z0-9_]+)", metrics.render().decode(), re.M))
    missing = sorted(used - exported)
    assert not missing, f"dashboard/alerts use metrics the service does not export: {missing}"
