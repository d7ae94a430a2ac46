"""``blazil demo --quick`` end to end, as a user runs it: a fresh cache, a real subprocess, nothing downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(900)
def test_quick_demo_runs_every_step(tmp_path, repo_root):
    env = {**os.environ, "BLAZIL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "blazil_ai", "demo", "--quick", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = {row["step"] for row in report["summary"]}
    assert {"samples", "data:text", "data:timeseries", "data:features", "data:audio", "data:detection", "fraud",
            "pipeline", "metrics", "total"} <= steps
    built = [row["detail"] for row in report["summary"] if row["step"] == "build"]
    assert len(built) == 5  # a fresh cache: every model was made
    for row in report["summary"]:
        if row["step"].startswith("data:"):
            assert row["result"].split()[0].isdigit() and int(row["result"].split()[0]) > 0
    fraud = report["fraud"]
    assert fraud["approved"] + fraud["review"] + fraud["rejected"] + fraud["failed"] == fraud["transfers"] == 20000
    assert fraud["failed"] == 0 and fraud["review"] > 0 and fraud["rejected"] > 0
    assert fraud["fraud_caught"] > fraud["false_alarms"]
    assert fraud["example_rejection"]["outcome"] == "rejected"
    assert [r.split()[1] for r in fraud["reviews_resolved"]] == ["posted", "voided"]
    pipe = report["pipeline"]
    assert pipe["random_weights"] is True and pipe["tokens"] == 8 and pipe["stages"].count("=") == 3
    assert "RANDOM-weight" in proc.stderr  # the demo says plainly that the text comes from random weights
    assert report["metrics_series"] > 0
    assert any('outcome="approved"' in ln for ln in report["metrics_fraud_series"])
    # A second run finds everything cached and builds nothing.
    again = subprocess.run([sys.executable, "-m", "blazil_ai", "demo", "--quick", "--json", "--skip", "pipeline",
                            "--skip", "data", "--transfers", "2000"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = json.loads(again.stdout.strip().splitlines()[-1])["summary"]
    assert not [r for r in rows if r["step"] == "build"]
